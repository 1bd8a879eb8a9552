"""The embedded default: ShapesWorld with tiny models that this project trains itself."""
