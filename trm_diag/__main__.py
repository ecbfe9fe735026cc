from trm_diag.cli import main

main()
