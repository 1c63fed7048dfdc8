"""Planner: budgets, per-module candidates with their cost and predicted damage, and the solvers."""
