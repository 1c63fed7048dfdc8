"""Sensitivity analysis: Hessian-vector products and the estimators built on them."""
