"""Ray Serve deployments that do ML work: model replicas and job workers."""
