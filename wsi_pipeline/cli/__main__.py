from wsi_pipeline.cli import program

program()
