"""The process node: a small kubelet stand-in that runs pods as local processes.

It registers a Node (with Lease heartbeats), watches the pods bound to it, and runs each
container's command from the project's virtualenv in a private mount namespace where the
pod's volumes are bind-mounted at their mountPaths. Container images are ignored. It also
answers PersistentVolumeClaims of the `local-path` StorageClass with local folders.
"""
