"""Simulated nights: raw exposures of a mosaic camera, with the truth they were built from
(:mod:`~calib_core.simulate.night`). Tests and benchmarks measure the pipeline against that truth.
"""
