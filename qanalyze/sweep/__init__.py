"""The sweep stage: for each budget, plan (the Hessian plan and its baselines), train, evaluate,
and collect every result in one record (``sweep.json``) and table (``sweep.csv``)."""
