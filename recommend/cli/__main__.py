from recommend.cli import main

main()
