from almdn_ray.cli import app

app()
