"""Serving proof: a real Triton Inference Server loads, serves and load-tests what retool publishes.

Entry points: ``retool.serve.check.check`` (retool repo check), ``retool.serve.session.open_session``
(a local Triton on a repository, or an existing one by URL), ``retool.serve.tune.tune`` (loadtest and
the budget search). See docs/serving.md.
"""
