from vae.cli import run

run()
