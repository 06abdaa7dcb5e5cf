"""The embedded toy text-to-image world: procedural scenes, their prompt grammar and a GenEval-like judge.

Kept import-free on purpose: generation code imports :mod:`stagevar.toy.scenes` (numpy only) and
must not pay for the evaluator's scipy import, so each submodule is imported explicitly.
"""
