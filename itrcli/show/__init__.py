"""Results to people: terminal output, previews, thumbnails, HTML contact sheets."""
