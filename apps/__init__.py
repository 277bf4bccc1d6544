"""Applications built on the ppzoo package (apps/web: the web service)."""
