"""``python -m gateway bench``: our backends side by side with stock python-socketio."""
