"""The annotation web app (``rlhfkit annotate serve``): FastAPI pages and a JSON API over the projects in
:mod:`rlhfkit.people`'s database. Everything else about human feedback (the database, the task types,
creating projects, exporting, agreement, collecting as a pipeline stage, the blind A/B) is in
:mod:`rlhfkit.people`, below the pipeline, so the pipeline can run it.
"""
