from sqaudio.cli import main

main()
