"""distill: a student learns a teacher's next-token distributions (losses.py; the stage is to come)."""
