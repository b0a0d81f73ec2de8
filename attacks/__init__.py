"""The published bit-flip attacks, usable from Python (docs/algorithms.md sections 5 to 8).

Each attack lives in a module named after it, behind the API of :mod:`attacks.base` (construct
with the hyperparameters, ``run`` returns a result with ``to_dict``), and works on a model in
integer mode (:func:`models.to_integer`). Nothing here knows of argparse.
"""
