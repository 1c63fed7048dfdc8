"""Export plans and quantized runs to the formats inference engines load (``qanalyze export``).

One module per format, each holding an `Exporter` and a module-level ``EXPORTER``, found by
`qanalyze.export.registry`; `qanalyze.export.run.export` is the driver the command line and
`qanalyze.verbs.export` call. The bits and column layouts each format stores come from
`qanalyze.quant.targets.TARGETS`, the table the planner's ``--target`` uses.
"""
