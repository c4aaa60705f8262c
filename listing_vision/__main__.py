from listing_vision.cli import main

main()
