from pipeline.cli import run

if __name__ == "__main__":  # not when a spawned worker of `build --jobs` imports it as __mp_main__
    run()
