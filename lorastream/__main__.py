from lorastream.cli import main

main()
