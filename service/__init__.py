"""lipcert service: FastAPI app, job runners, inference worker, storage and the CLI."""
