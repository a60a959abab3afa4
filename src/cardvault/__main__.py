from cardvault.cli import main

main()
