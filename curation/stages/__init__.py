"""One module per stage; each exposes ``STAGE``. See curation/stage.py for the contract."""
