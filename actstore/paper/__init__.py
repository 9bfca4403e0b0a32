"""The paper end to end: the HTML/Markdown report over a store (every analysis, and the browser's feature pages
linked from it) and the demo that runs every stage on bundled data. Above the browser, below the CLI."""
