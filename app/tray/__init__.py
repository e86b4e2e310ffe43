"""The tray icon: a picture of the GPU memory the models hold, a menu of actions, a supervised daemon.

view.py turns control API answers into what is shown; icon.py draws it;
menu.py lists the entries; dispatcher.py runs every command and never raises;
supervisor.py keeps the daemon child alive; popup.py is the menu on backends
that have none (pystray's xorg); app.py ties them to pystray.
"""
