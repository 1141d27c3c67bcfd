from wsi_pipeline.cli import main

main()
