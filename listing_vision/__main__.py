from listing_vision.cli import main

if __name__ == "__main__":  # not when a spawned child process (compare) imports it
    main()
