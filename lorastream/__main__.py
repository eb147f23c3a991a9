from lorastream.entry import main

main()
