"""The only package that imports Ray: thin glue from Ray Train / Ray Data to the Ray-free code."""
