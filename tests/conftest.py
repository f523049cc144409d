"""Suite-wide settings."""

import os
import tempfile

# Runs in the suite never read the machine's calibration profile (polytrain calibrate): a result's
# predicted step would otherwise depend on what was calibrated here. Tests of the performance model pass
# their own profile.
os.environ["POLYTRAIN_PROFILE"] = os.path.join(tempfile.gettempdir(), "polytrain-tests-no-profile", "profile.json")
