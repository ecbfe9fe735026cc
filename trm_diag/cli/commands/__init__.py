"""One module per command, each holding its typer function; app.py registers them. Heavy modules
(torch, pandas, pyarrow) are imported inside the functions, so that `--help`, `bounds`, `gate` and
`show` start fast."""
