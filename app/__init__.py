"""The Gradio front end of LoRA Studio: a thin adapter over trainer/ (no ML code here).

main.py parses the flags and launches; folders.py says where files live; uploads.py writes datasets;
jobs.py runs the training CLI as a subprocess and follows its events; train_tab.py and gallery_tab.py are the UI.
"""
