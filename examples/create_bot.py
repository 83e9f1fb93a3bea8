"""The LD7 spec's Python example (Example 3), unchanged but for where it points.

Run against a local botvisor:
    BOTVISOR_URL=http://localhost:8000 API_KEY=your_api_key_here python3 examples/create_bot.py
Needs: pip install requests
"""
import os
import sys

import requests

BASE_URL = os.environ.get('BOTVISOR_URL', 'http://localhost:8000')
API_KEY = os.environ.get('API_KEY', 'your_api_key_here')
USER_ID = os.environ.get('BOT_USER_ID', 'example_python')
PHONE = os.environ.get('BOT_PHONE', '1234567890')


def create_bot():
    url = f'{BASE_URL}/api/sessions'
    headers = {
        'Content-Type': 'application/json',
        'X-API-Key': API_KEY
    }
    data = {
        'userId': USER_ID,
        'phoneNumber': PHONE
    }

    response = requests.post(url, json=data, headers=headers)
    result = response.json()

    if result['success']:
        print(f"Pairing Code: {result['pairingCode']}")
        print("Enter this code in WhatsApp")
    else:
        print(f"Error: {result['message']}")
        sys.exit(1)


create_bot()
