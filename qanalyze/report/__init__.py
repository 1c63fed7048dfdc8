"""The report stage: records (sensitivity, plan, sweep) -> tables -> figures -> one self-contained HTML page."""
