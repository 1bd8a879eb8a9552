"""The any-to-any generation service on Ray Serve (`serve.app`), its API (`serve.schema`) and a
client (`serve.client`)."""
