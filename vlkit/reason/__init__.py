"""Reasoning by tree search: puzzle games, IO/CoT/ATS-BFS/ATS-DFS/ToT methods, backends, fine-tuning traces."""
