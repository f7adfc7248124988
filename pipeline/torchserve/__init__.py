"""A real TorchServe: starting and stopping it with the safe configuration (`server`), checking that served
archives answer like eager (`smoke`), fitting requests to a served model (`fit`), placing archives in a server's
store (`placement`), deploys with rollback (`deploy`) that drain a version before unregistering it (`drain`),
a reused workdir kept to one run (`workdir`), `marpipe serve` in the foreground (`serve`) with its public gRPC port
in front of TorchServe's (`grpc_front`), and the KServe layout (`kserve`).

Beside the build: may import `stages` (smoke replays parity samples), `store`, `spec` and the ground modules;
never `build` or `cli`.
"""
