"""`dreambooth serve`: characters drawn on demand over HTTP, batched, queued, cached, authenticated and measured."""
