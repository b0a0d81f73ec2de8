"""Attack campaigns and their results (docs/algorithms.md sections 7 to 9).

- :mod:`campaigns.runner`: the one runner that drives every registered attack over the items of
  a campaign: records appended as each item ends, resume, torchrun sharing, progress, TensorBoard;
- :mod:`campaigns.results`: the record fields (defined once), the JSON-lines files that hold
  them and the summary tables;
- :mod:`campaigns.report`: the paper's tables and figures from result folders (read-only).
"""
