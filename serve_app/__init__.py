"""The Serve application: FastAPI gateway, schemas, settings and the service clients."""
