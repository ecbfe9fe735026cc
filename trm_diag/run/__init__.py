"""Orchestration: compare / score, sweep, locate, merge and shards load engines (backends/) and write
reports (report/). Only cli/ imports this layer.
"""
