"""The report folder: tables, outputs and locks, partial chunks, input files, summary readers, verdict,
diff, HTML and plots, gate evaluation. Imports math/ and the leaves, never an engine.
"""
