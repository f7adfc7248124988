"""Running builds: the one `runner` (stages in order, timed, reported), `auto` (every candidate format, the fastest
packaged) with the candidate `trial` it shares with `bench`, release jobs (`release`: many specs, jobs, shards),
the build key and cache (`cache`), and the reports CI reads (`reports`).

May import `stages`, `store`, `sources`, `spec` and the ground modules; never `torchserve` or `cli`.
"""
