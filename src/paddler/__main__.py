from paddler.cli import main

main()
