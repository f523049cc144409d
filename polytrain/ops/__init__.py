"""Level-0 operators: convolution algorithms, their work and depth, reduced precision, gradient checks.

Import the submodules directly (`polytrain.ops.conv`, `polytrain.ops.workdepth`, `polytrain.ops.gradcheck`):
`workdepth` and `geometry` are pure arithmetic that the cost model imports without pulling in the
operators themselves.
"""
