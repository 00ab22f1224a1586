"""Composition logic between the pages and the inference / database layers.

Nothing here imports Streamlit: each function takes plain values (arrays, ids, a session
factory) and returns plain values, so it is tested without a browser and reused by scripts.

- ``services.identity``  who is using the app (the one seam for a real log-in later)
- ``services.runtime``   configuration: database URL, checkpoint path, samples folder
- ``services.bootstrap`` first start: tables, the shipped model version, the bundled samples
- ``services.ingest``    an uploaded file -> stored study -> one prediction per active model
- ``services.studies``   reading a study back (image, prediction, versions) for the pages
- ``services.masks``     canvas strokes -> mask on the image grid, Dice, canvas backgrounds
- ``services.display``   window/level presets, the four panels, plotly figures, thumbnails
"""
