"""The published bit-flip attacks, usable from Python (docs/algorithms.md sections 5 to 8).

Each attack lives in a module named after it and works on a model in integer mode
(:func:`models.to_integer`). Nothing here knows of argparse.
"""
