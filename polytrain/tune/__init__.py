"""Meta-optimization: hyper-parameter search whose trials are polytrain runs (`polytrain tune`)."""

from polytrain.tune.run import OBJECTIVES, SAMPLERS, Objective, TuneSpec, derive_seed, pareto_front, tune
from polytrain.tune.space import Dimension, SearchSpace
from polytrain.tune.study import Study

__all__ = ["OBJECTIVES", "SAMPLERS", "Objective", "TuneSpec", "derive_seed", "pareto_front", "tune", "Dimension",
           "SearchSpace", "Study"]
