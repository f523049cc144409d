"""Level-0 operators: convolution algorithms, reduced precision, gradient checks.

Import the submodules directly (`polytrain.ops.conv`, `polytrain.ops.precision`, `polytrain.ops.gradcheck`).
The work, depth and multiplication counts of the convolution algorithms are pure shape arithmetic and live
with the cost model in `polytrain.cost.workdepth` (and `polytrain.cost.geometry`).
"""
