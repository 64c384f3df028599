"""ktutorial: serve MiniMax-M2.1 with SGLang + KT-Kernel on one workstation, reproducibly.

The modules, in the order data flows through them: spec -> hardware -> plan -> engines ->
server -> client -> bench -> results -> report and plots -> notebooks, tutorial (the runner),
docs, cli. `tiny` makes the embedded model the whole tutorial runs on without a GPU; `hybrid`
runs the GPU/CPU expert split on it. tests/test_architecture.py keeps the import graph acyclic.
"""

__version__ = "0.1.0"
