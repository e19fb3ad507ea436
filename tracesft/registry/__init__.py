"""Stage 4, the registry: adapters registered in MLflow with lineage, promoted on a measured win.

`model_registry` registers, gates, promotes and rolls back; `serving` loads a registered adapter
by alias or version and answers with it.
"""
